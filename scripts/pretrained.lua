-- pretrained: a real pretrained teacher for experiments (a Hugging Face directory, or the SmolLM2-135M
-- GGUF that set-up fetches) and its corpus cut into disjoint held-out, calibration and training blocks.
local torch = require 'torch'
local nn = require 'nn'
local gguf = require 'gguf'
local data = require 'data'
local tokenizers = require 'tokenizers'
local qatlab = require 'qatlab'

local M = {}

-- The GGUF tools/fetch_smollm2.sh puts in the checkout.
M.SMOLLM2 = qatlab.scripts_dir .. '/../.cache/models/smollm2-135m-instruct-q4_1.gguf'

-- The options rule of the toolkit (opts.check): a typo names the closest known option.
local function check(o, known, who) return require('opts').check(o, known, who, 4) end

-- load{gguf = M.SMOLLM2, dir = '', dtype = 'float32', device = qatlab.device} ->
-- {fresh = function() -> a new float copy of the model in eval mode, tokenizer =, config =, source =}.
-- dir (a Hugging Face directory) wins over gguf when given.
function M.load(o)
  o = o or {}
  check(o, {gguf = true, dir = true, dtype = true, device = true}, 'pretrained.load')
  local dir, path = o.dir or '', o.gguf or M.SMOLLM2
  local place = {dtype = o.dtype or 'float32', device = o.device or qatlab.device}
  local r = {}
  if dir ~= '' then
    r.tokenizer, r.source = tokenizers.from_file(dir), dir
    function r.fresh()
      local m = nn.from_pretrained(dir, place)
      m:eval()
      return m
    end
  else
    local f = io.open(path, 'rb')
    if not f then error(('no model at %s: run tools/fetch_smollm2.sh, or pass --set dir=HF_DIR'):format(path), 0) end
    f:close()
    local tensors
    tensors, r.config = gguf.load(path)
    r.tokenizer, r.source = tokenizers.from_gguf(path), path
    function r.fresh()
      local m = nn.from_config(r.config, place)
      m:load_state_dict(tensors)
      m:eval()
      return m
    end
  end
  return r
end

-- The first `bytes` of a text file's lines (or of the King James Bible when path is '' or nil).
function M.text(path, bytes)
  local t = (path and path ~= '') and table.concat(data.read_text(path), '\n') or data.kjv_text()
  return bytes and t:sub(1, bytes) or t
end

-- blocks(tk, {text =, bytes = 400000, L = 128, seed = 0, held =, calib =, train =, batch =}) ->
-- {held = (H, L), calib = {batches}, train = (N, L) or nil, all = (M, L)}: the text's lines tokenized
-- into blocks of L, shuffled, then cut in that order (never the same block twice). train = nil takes
-- every block left.
function M.blocks(tk, o)
  check(o, {text = true, bytes = true, L = true, seed = true, held = true, calib = true, train = true, batch = true},
        'pretrained.blocks')
  local L, batch = o.L or 128, o.batch or 8
  local lines = {}
  for line in M.text(o.text, o.bytes or 400000):gmatch('[^\n]+') do lines[#lines + 1] = line end
  local all = data.shuffle(data.pack(tk, lines, {L = L}), {seed = o.seed or 0})               -- (M, L)
  local held, calib = o.held or 0, o.calib or 0
  local train = o.train or (all:size(1) - held - calib)
  if train < 0 or all:size(1) < held + calib + train then
    error(('pretrained.blocks: %d blocks of %d tokens in the text, %d needed (held %d + calib %d + train %d): '
      .. 'raise bytes'):format(all:size(1), L, held + calib + train, held, calib, train), 2)
  end
  local r = {all = all, held = held > 0 and all:narrow(1, 1, held) or nil, calib = {}}
  for s = 0, calib - 1, batch do r.calib[#r.calib + 1] = all:narrow(1, held + s + 1, math.min(batch, calib - s)) end
  if train > 0 then r.train = all:narrow(1, held + calib + 1, train) end
  return r
end

-- exp(mean next-token CE) of m over the first n rows of blocks (B, L), `batch` rows at a time.
function M.perplexity(m, blocks, batch, n)
  n, batch = n or blocks:size(1), batch or 8
  local nll = 0
  torch.no_grad(function()
    for s = 1, n, batch do
      nll = nll + m:loss(blocks:narrow(1, s, math.min(batch, n - s + 1)), {reduction = 'sum'}):item()
    end
  end)
  return math.exp(nll / (n * (blocks:size(2) - 1)))
end

return M
