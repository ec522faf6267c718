-- precision: the trainer's choice between fp32 and bf16 autocast. 'auto' is bf16 on CUDA and on CPUs whose
-- bf16 matmuls are fast (AMX-BF16 or AVX512-BF16, read from the CPU flags), fp32 on every other CPU.
local torch = require 'torch'

local M = {}

-- resolve(p, device_type, caps) -> name ('fp32' | 'bf16'), autocast device type (nil | 'cpu' | 'cuda'), why.
-- p: 'auto' | 'fp32' | 'bf16' (nil = 'auto'); device_type 'cpu' or 'cuda'; caps: torch.cpu.capabilities()
-- (given by tests to stand for another CPU). Parameters, gradients and optimizer state stay fp32 under bf16.
function M.resolve(p, device_type, caps, level)
  p = p or 'auto'
  if p ~= 'auto' and p ~= 'fp32' and p ~= 'bf16' then
    error(("trainer.new: precision must be 'auto', 'fp32' or 'bf16', got %q"):format(tostring(p)), level or 2)
  end
  local cuda = device_type == 'cuda'
  if p == 'fp32' then return 'fp32', nil, 'precision = fp32 (given)' end
  if p == 'bf16' then return 'bf16', device_type, 'precision = bf16 (given)' end
  if cuda then return 'bf16', 'cuda', 'auto: bf16 autocast on CUDA' end
  caps = caps or torch.cpu.capabilities()
  local name = (caps.cpu_name and caps.cpu_name ~= '') and caps.cpu_name or 'this CPU'
  if caps.amx_bf16 and caps.amx_tile then
    return 'bf16', 'cpu', ('auto: bf16 autocast on the CPU (%s has AMX-BF16)'):format(name)
  elseif caps.avx512_bf16 then
    return 'bf16', 'cpu', ('auto: bf16 autocast on the CPU (%s has AVX512-BF16)'):format(name)
  end
  return 'fp32', nil, ('auto: fp32 on the CPU (%s has no AMX-BF16 or AVX512-BF16%s: bf16 matmuls would be slower)')
    :format(name, caps.capability and caps.capability ~= '' and ('; LibTorch kernels ' .. caps.capability) or '')
end

return M
