-- json_spec: the canonical encoder (escapes, numbers, sorted keys, arrays vs objects, errors)
-- and the decoder (round trips, unicode escapes, strict syntax errors).
local json = require 'json'

describe('json.encode', function()
  it('encodes scalars', function()
    assert.equal('null', json.encode(nil))
    assert.equal('null', json.encode(json.null))
    assert.equal('true', json.encode(true))
    assert.equal('false', json.encode(false))
    assert.equal('"hi"', json.encode('hi'))
  end)

  it('escapes strings per RFC 8259', function()
    assert.equal([["a\"b\\c/d"]], json.encode('a"b\\c/d'))
    assert.equal([["q\"\\"]], json.encode('q"\\'))
    assert.equal([["\b\f\n\r\t"]], json.encode('\b\f\n\r\t'))
    assert.equal([["\u0000\u0001\u001f"]], json.encode('\0\1\31'))
    assert.equal('"a/b é"', json.encode('a/b é'))
  end)

  it('writes integers without exponent and other numbers so they read back', function()
    assert.equal('0', json.encode(0))
    assert.equal('-3', json.encode(-3))
    assert.equal('1000000', json.encode(1e6))
    assert.equal('9007199254740991', json.encode(2 ^ 53 - 1))
    assert.equal('0.001', json.encode(1e-3))
    assert.equal('0.1', json.encode(0.1))
    assert.equal('0.30000000000000004', json.encode(0.1 + 0.2))
    assert.equal('2.5e-07', json.encode(2.5e-7))
    assert.equal('1e+300', json.encode(1e300))
    for _, x in ipairs({ math.pi, 1 / 3, -2.2250738585072014e-308, 123456.789 }) do
      assert.equal(x, tonumber(json.encode(x)))
    end
  end)

  it('refuses NaN and Inf', function()
    assert.has_error(function() json.encode(0 / 0) end)
    assert.has_error(function() json.encode({ x = math.huge }) end)
    assert.has_error(function() json.encode(-math.huge) end)
  end)

  it('tells arrays from objects and sorts object keys', function()
    assert.equal('[1,2,3]', json.encode({ 1, 2, 3 }))
    assert.equal('{}', json.encode({}))
    assert.equal('{"a":1,"b":[true,{"c":null}],"z":"x"}',
                 json.encode({ z = 'x', b = { true, { c = json.null } }, a = 1 }))
    assert.equal('{"1":"a","3":"c"}', json.encode({ [1] = 'a', [3] = 'c' }))
    assert.equal('{"1":"a","x":2}', json.encode({ 'a', x = 2 }))
  end)

  it('is canonical: the same table built in another order gives the same text', function()
    local a, b = {}, {}
    for i = 1, 50 do a['k' .. i] = i end
    for i = 50, 1, -1 do b['k' .. i] = i end
    assert.equal(json.encode(a), json.encode(b))
  end)

  it('refuses cycles, functions and odd keys, but allows shared subtables', function()
    local t = { x = 1 }
    t.self = t
    assert.has_error(function() json.encode(t) end)
    assert.has_error(function() json.encode({ f = print }) end)
    assert.has_error(function() json.encode({ [true] = 1 }) end)
    local shared = { 1 }
    assert.equal('{"a":[1],"b":[1]}', json.encode({ a = shared, b = shared }))
  end)
end)

describe('json.decode', function()
  it('round-trips nested values', function()
    local v = { name = 'run "1"\n', lr = 3e-4, steps = 1000, flags = { true, false, json.null },
                nested = { a = { b = { -1.5, 'x' } } }, empty = {} }
    local text = json.encode(v)
    assert.same(v, json.decode(text))
    assert.equal(text, json.encode(json.decode(text)))
  end)

  it('reads whitespace, exponents and escapes', function()
    assert.same({ a = { 1, -2.5, 300, 0.01 } }, json.decode(' { "a" : [ 1 , -2.5e0, 3E2, 1e-2 ] } \n'))
    assert.equal('A/\n"', json.decode('"\\u0041\\/\\n\\""'))
    assert.equal('é', json.decode('"\\u00e9"'))
    assert.equal('€', json.decode('"\\u20ac"'))
    assert.equal('😀', json.decode('"\\ud83d\\ude00"'))
    assert.equal(json.null, json.decode('null'))
  end)

  it('rejects malformed text with a position', function()
    for _, bad in ipairs({ '', '{', '[1,]', '{"a" 1}', '01', '1.', '.5', '1e', '"abc', 'tru',
                           '[1] x', '{a:1}', '"\\x"', '"\\ud83d"', '"a\nb"', 'NaN' }) do
      local ok, err = pcall(json.decode, bad)
      assert.is_false(ok, bad)
      assert.matches('json: .* at position %d+', err)
    end
  end)
end)
