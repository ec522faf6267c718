-- run_spec: runs busted spec files inside the qatlab host, so specs test the real bindings.
-- CTest calls: qatlab run --device cpu tests/lua/run_spec.lua -- SPEC.lua
_G.arg = arg  -- busted's command line reads the global arg, as under the lua executable
require('busted.runner')({ standalone = false })
