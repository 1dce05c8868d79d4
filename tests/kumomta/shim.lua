--[[
Just enough of KumoMTA's Lua world to run contrib/kumomta/ with Debian's Lua 5.1 and redis-lua
against a real kiln (tests/test_kumomta_lua.py): `kumo.on`, `kumo.reject`,
`kumo.make_queue_config`, `kumo.configure_redis_throttles`, `kumo.configure_log_hook`,
`kumo.make_throttle` (sent to kiln as KumoMTA sends redis throttles: `CL.THROTTLE
NAME:limit:burst:period burst limit period 1`), the `redis` module (`redis.open{node=...}` and
`conn:query`, raising on error replies), messages, and the two policy-extras helpers (which
only record the files they are given). KumoMTA itself cannot be installed here.
]]

local nrk = require 'redis' -- redis-lua, replaced below by KumoMTA's module's shape

local shim = { handlers = {}, rejected = nil, throttle_node = nil, log_hooks = {}, files = {}, now = 0 }

local function open(params)
  local node = params.node
  local path = node:match('^redis%+unix://(.+)$') or node:match('^unix://(.+)$')
  local client
  if path then
    client = nrk.connect { scheme = 'unix', path = path }
  else
    local host, port = node:match('^redis://([^:/]+):?(%d*)')
    client = nrk.connect(host, tonumber(port) or 6379)
  end
  local conn = {}
  function conn.query(self, cmd, ...)
    return nrk.command(cmd)(client, ...)
  end
  return conn
end

package.loaded['redis'] = { open = open }

local kumo = {}

function kumo.on(name, fn)
  shim.handlers[name] = fn
end

function kumo.reject(code, text)
  error({ kumo_reject = true, code = code, text = text }, 0)
end

function kumo.make_queue_config(t)
  return t
end

function kumo.configure_redis_throttles(params)
  shim.throttle_node = params.node
end

function kumo.configure_log_hook(params)
  shim.log_hooks[params.name] = params
end

local SECONDS = { s = 1, m = 60, h = 3600, d = 86400 }

function kumo.make_throttle(name, spec)
  local limit, unit = spec:match('^(%d+)/(%a)')
  local period = SECONDS[unit]
  assert(limit and period, 'throttle spec ' .. spec)
  local throttle = {}
  function throttle.delay_message_if_throttled(self, msg)
    assert(shim.throttle_node, 'configure_redis_throttles was not called')
    local conn = open { node = shim.throttle_node }
    local key = string.format('%s:%s:%s:%d', name, limit, limit, period)
    local r = conn:query('CL.THROTTLE', key, limit, limit, period, 1)
    if r[1] == 1 then
      msg.due = shim.now + r[4]
      return true
    end
    return false
  end
  return throttle
end

package.loaded['kumo'] = kumo
_G.kumo = kumo

package.loaded['policy-extras.sources'] = {
  setup = function(self, files)
    shim.files.sources = files
  end,
}
package.loaded['policy-extras.shaping'] = {
  setup = function(self, files)
    shim.files.shaping = files
    return function() end
  end,
}

--- A message as the events see it: one recipient, or an SMTP batch of several
--- (`addresses` separated by commas), whose recipient() is then a list.
function shim.message(addresses)
  local list = {}
  for address in addresses:gmatch('[^,]+') do
    local user, domain = address:match('^(.*)@(.*)$')
    list[#list + 1] = { user = user, domain = domain, address = address }
  end
  local msg = { meta = {}, due = nil, rcpt = list[1], batch = list }
  function msg.set_meta(self, k, v)
    self.meta[k] = v
  end
  function msg.get_meta(self, k)
    return self.meta[k]
  end
  function msg.recipient(self)
    if #self.batch > 1 then
      return self.batch
    end
    return self.rcpt
  end
  return msg
end

--- Call a handler; a kumo.reject comes back as (false, code, text).
function shim.fire(name, ...)
  local fn = shim.handlers[name]
  assert(fn, 'no handler for ' .. name)
  local ok, r = pcall(fn, ...)
  if ok then
    return true, r
  end
  if type(r) == 'table' and r.kumo_reject then
    return false, r.code, r.text
  end
  error(r, 0)
end

return shim
