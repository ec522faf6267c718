-- ema: weight averages of a list of parameter tensors: an exponential moving average (shadow
-- <- d*shadow + (1-d)*param) and SWA (a running mean from a start step). The shadows live on the
-- parameters' device (a per-step CPU copy cost parameter-golf 32%); half/bf16 params get fp32 shadows.
local torch = require 'torch'

local opts = require 'opts'

local M = {}

local function shadow_of(p, dtype)
  local t = p:detach():clone()
  if dtype then return t:to{ dtype = dtype } end
  if p.dtype == 'float16' or p.dtype == 'bfloat16' then return t:float() end
  return t
end

local function check(self, params)
  assert(#params == #self.shadow, ('expected %d parameters, got %d'):format(#self.shadow, #params))
end

local function copy_to(self, params)
  check(self, params)
  torch.no_grad(function()
    for i, p in ipairs(params) do p:copy_(self.shadow[i]) end
  end)
end

-- EMA -------------------------------------------------------------------------------------

local Ema = {}
Ema.__index = Ema

-- ema.new(params, {decay=0.997, warmup=false, dtype=}): shadows start as copies of params.
-- warmup=true uses min(decay, (1+n)/(10+n)) after n updates (timm's ModelEmaV2 style).
function M.new(params, o)
  opts.check_value(params, 'table', 'ema.new', 'argument #1 (the parameter list)', 3)
  o = opts.check(o, {decay = 'number', warmup = 'boolean', dtype = 'string'}, 'ema.new')
  local self = setmetatable({ decay = o.decay or 0.997, warmup = o.warmup or false, num_updates = 0,
                              shadow = {} }, Ema)
  assert(self.decay >= 0 and self.decay <= 1, 'ema: decay must be in [0, 1]')
  for i, p in ipairs(params) do self.shadow[i] = shadow_of(p, o.dtype) end
  return self
end

-- The decay the next update will use.
function Ema:current_decay()
  if not self.warmup then return self.decay end
  local n = self.num_updates
  return math.min(self.decay, (1 + n) / (10 + n))
end

-- shadow <- d*shadow + (1-d)*param, in place, without autograd.
function Ema:update(params)
  check(self, params)
  local d = self:current_decay()
  torch.no_grad(function()
    for i, p in ipairs(params) do
      local s = self.shadow[i]
      s:mul_(d):add_(p:to{ dtype = s.dtype }, { alpha = 1 - d })
    end
  end)
  self.num_updates = self.num_updates + 1
end

-- Writes the averages into params (in place, keeping their dtype).
Ema.copy_to = copy_to

-- {decay=, num_updates=, shadow={tensors}} (the tensors themselves, not copies).
function Ema:state()
  return { decay = self.decay, num_updates = self.num_updates, shadow = self.shadow }
end

function Ema:load_state(st)
  assert(#st.shadow == #self.shadow, 'ema.load_state: wrong number of tensors')
  self.decay, self.num_updates = st.decay, st.num_updates
  torch.no_grad(function()
    for i, t in ipairs(st.shadow) do self.shadow[i]:copy_(t) end
  end)
end

-- SWA -------------------------------------------------------------------------------------

local Swa = {}
Swa.__index = Swa

-- ema.swa(params, {start=0, every=1, start_frac=, dtype=}): averages the params seen by
-- update(params, step, ctx) at steps >= start with (step - start) % every == 0; with start_frac the
-- start is instead the first update where ctx.elapsed / ctx.budget >= start_frac.
function M.swa(params, o)
  opts.check_value(params, 'table', 'ema.swa', 'argument #1 (the parameter list)', 3)
  o = opts.check(o, {start = 'number', every = 'number', start_frac = 'number', dtype = 'string'}, 'ema.swa')
  local self = setmetatable({ start = o.start or 0, every = o.every or 1, start_frac = o.start_frac,
                              count = 0, shadow = {} }, Swa)
  for i, p in ipairs(params) do self.shadow[i] = shadow_of(p, o.dtype) end
  return self
end

-- Folds params into the running mean when the step qualifies; returns true if it did.
function Swa:update(params, step, ctx)
  check(self, params)
  step = step or 0
  if self.start_frac then
    if self.started_at == nil then
      assert(ctx and ctx.elapsed and ctx.budget, 'swa: start_frac needs ctx = {elapsed=, budget=}')
      if ctx.elapsed / ctx.budget < self.start_frac then return false end
      self.started_at = step
    end
    if (step - self.started_at) % self.every ~= 0 then return false end
  elseif step < self.start or (step - self.start) % self.every ~= 0 then
    return false
  end
  self.count = self.count + 1
  local w = 1 / self.count
  torch.no_grad(function()
    for i, p in ipairs(params) do
      local s = self.shadow[i]
      if self.count == 1 then s:copy_(p) else s:add_(p:to{ dtype = s.dtype } - s, { alpha = w }) end
    end
  end)
  return true
end

-- Writes the average into params; an error before the first averaged step.
function Swa:copy_to(params)
  assert(self.count > 0, 'swa: no step has been averaged yet')
  copy_to(self, params)
end

function Swa:state()
  return { count = self.count, start = self.start, every = self.every, shadow = self.shadow }
end

function Swa:load_state(st)
  assert(#st.shadow == #self.shadow, 'swa.load_state: wrong number of tensors')
  self.count = st.count
  torch.no_grad(function()
    for i, t in ipairs(st.shadow) do self.shadow[i]:copy_(t) end
  end)
end

return M
