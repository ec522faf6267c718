-- luacheck: the project's Lua is LuaJIT with no globals of its own.
std = 'luajit'
max_line_length = 120
files['tests/lua'] = { std = '+busted', max_line_length = false }
files['tests/lua/run_spec.lua'] = { globals = { 'arg' } }
