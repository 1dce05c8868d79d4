--[[
kiln for KumoMTA (docs/integrations/kumomta.md).

Each message leaves from the IP kiln picks for its recipient's provider (warming IPs while
their caps have room, then the pool's warm IPs), mail no IP has room for waits, retries are
held to the same caps, and every delivery outcome goes back to kiln. kiln is reached over its
Redis-protocol socket with KumoMTA's own `redis` module; nothing here needs a JSON library.

    local kiln = require 'kiln'
    kiln.setup { node = 'redis+unix:///var/lib/kiln/resp.sock', pool = 'main' }

then call `kiln.route`, `kiln.queue_config`, `kiln.throttle` and `kiln.report` from the
policy's handlers, as contrib/kumomta/policy.lua does. Written for the Lua of KumoMTA (5.4) and
tested with Debian's Lua 5.1 interpreter and redis-lua (tests/test_kumomta_lua.py).
]]

local redis = require 'redis'

local kiln = {}

local unpack = table.unpack or unpack

local settings = {
  -- kiln's Redis-protocol socket (`kiln run` serves STATE_DIR/resp.sock).
  node = nil,
  -- The kiln pool this KumoMTA's mail goes through (a pool of the plan).
  pool = nil,
  -- While kiln does not answer: 'defer' (451, the sender retries; the default) or 'pass'
  -- (the message is routed by the rest of the policy, unthrottled: only for warm pools).
  when_down = 'defer',
  -- How long one question to kiln may take.
  timeout = '2s',
  -- Names of kiln's egress sources and single-source pools (`kiln render kumomta`).
  prefix = 'kiln-',
  -- The suppression scope of this mail (a sending domain, stream or tenant; kiln's
  -- `mta_scope` characters): recipients listed for it are refused too. nil: the global
  -- list only.
  scope = nil,
}

local KNOWN = { node = true, pool = true, when_down = true, timeout = true, prefix = true, scope = true }

local conn = nil

--- Configure the module once, from the policy's top level.
function kiln.setup(options)
  for k, v in pairs(options) do
    if not KNOWN[k] then
      error('kiln.setup: unknown option ' .. tostring(k), 2)
    end
    settings[k] = v
  end
  if type(settings.node) ~= 'string' or type(settings.pool) ~= 'string' then
    error('kiln.setup: node (kiln\'s socket as a URL) and pool are required', 2)
  end
  if settings.when_down ~= 'defer' and settings.when_down ~= 'pass' then
    error('kiln.setup: when_down must be defer or pass', 2)
  end
end

--- Ask kiln one command: true and the reply, or false and the error. A failed connection is
--- reopened at the next question.
local function ask(...)
  if conn == nil then
    local ok, c = pcall(redis.open, {
      node = settings.node,
      connect_timeout = settings.timeout,
      response_timeout = settings.timeout,
    })
    if not ok then
      return false, c
    end
    conn = c
  end
  local ok, reply = pcall(conn.query, conn, ...)
  if not ok and not tostring(reply):find('ERR', 1, true) then
    conn = nil -- not kiln's answer: the connection broke
  end
  return ok, reply
end

--- The name of the egress source (and of its single-source pool) for `ip`: what
--- `kiln render kumomta` writes, e.g. kiln-192-0-2-10 or kiln-2001-db8--1.
function kiln.source_name(ip)
  return settings.prefix .. (ip:gsub('[.:]', '-'))
end

--- The message's recipients: a list of one, or of each of an SMTP batch's.
local function recipients_of(msg)
  local rcpt = msg:recipient()
  if type(rcpt) == 'table' and rcpt.domain == nil then
    return rcpt -- an SMTP batch: one recipient domain per message in a kiln queue
  end
  return { rcpt }
end

local function domain_of(msg)
  return recipients_of(msg)[1].domain
end

local function address_of(rcpt)
  return tostring(rcpt.user) .. '@' .. tostring(rcpt.domain)
end

local function refuse_suppressed(address, event)
  kumo.reject(550, string.format('5.7.1 kiln: %s is on the suppression list (%s)', address, event))
end

--- The other recipients of an SMTP batch, checked against the suppression list in one
--- question before anything is charged (the first is checked by KILN.PICK): 550 when one is
--- listed, so nobody who said no is mailed (the batch is refused whole). Unanswered: left to
--- KILN.PICK, which meets the same trouble.
local function check_batch(recipients)
  if #recipients < 2 then
    return
  end
  local args = { 'KILN.SUPPRESSED', settings.scope or '' }
  for i = 2, #recipients do
    args[#args + 1] = address_of(recipients[i])
  end
  local ok, listed = ask(unpack(args))
  if not ok then
    return
  end
  for i, event in ipairs(listed) do
    if type(event) == 'string' and event ~= 'invalid' then
      refuse_suppressed(args[i + 2], event)
    end
  end
end

--- At reception (smtp_server_message_received, http_message_generated): the IP kiln picks
--- carries the message (its tenant routes it to that IP's pool). A recipient on kiln's
--- suppression list (global, or the `scope` setting's): 550 5.7.1, nothing charged. Denied:
--- 451 with kiln's reason, and the sender retries; a null-MX domain: 550. Returns the IP, or
--- nil when kiln is down and when_down is 'pass'.
function kiln.route(msg)
  local recipients = recipients_of(msg)
  local domain = recipients[1].domain
  local pool = settings.pool
  if settings.scope then
    pool = pool .. '/' .. settings.scope
  end
  check_batch(recipients)
  local ok, r = ask('KILN.PICK', pool, address_of(recipients[1]))
  if not ok then
    local text = tostring(r)
    if text:find('null MX', 1, true) then
      kumo.reject(550, '5.1.10 kiln: ' .. domain .. ' publishes a null MX and accepts no mail')
    end
    local refused = text:match('ERR (.*)$')
    if refused then -- kiln answered: a mistake in the policy or the plan (an unknown pool)
      kumo.reject(451, '4.3.5 kiln: ' .. refused)
    end
    if settings.when_down == 'pass' then
      return nil
    end
    kumo.reject(451, '4.4.3 kiln: the warm-up scheduler did not answer; try again later')
  end
  local granted, reason, ip, provider = r[1], r[2], r[4], r[5]
  if reason == 'suppressed' then
    refuse_suppressed(address_of(recipients[1]), r[7])
  end
  if granted > 0 then
    msg:set_meta('tenant', kiln.source_name(ip))
    msg:set_meta('kiln_ip', ip)
    msg:set_meta('kiln_paid', true)
    return ip
  end
  kumo.reject(
    451,
    string.format('4.7.0 kiln: waiting for room at %s in pool %s (%s)', provider, settings.pool, reason)
  )
end

--- get_queue_config: a message kiln routed goes through the pool of its one source.
function kiln.queue_config(domain, tenant)
  if type(tenant) == 'string' and tenant:sub(1, #settings.prefix) == settings.prefix then
    return kumo.make_queue_config { egress_pool = tenant }
  end
  return nil
end

--- throttle_insert_ready_queue: the first attempt was paid at reception; every retry asks
--- kiln again through the throttle `kiln/IP/DOMAIN` (kiln's caps, not the spec's numbers),
--- and KumoMTA delays the message by kiln's wait when there is no room. Needs
--- kumo.configure_redis_throttles { node = <kiln's socket> } in init. Returns true if the
--- message was delayed.
function kiln.throttle(msg)
  local ip = msg:get_meta('kiln_ip')
  if ip == nil then
    return false
  end
  if msg:get_meta('kiln_paid') then
    msg:set_meta('kiln_paid', false)
    return false
  end
  local name = string.format('kiln/%s/%s', ip, domain_of(msg))
  local ok, delayed = pcall(function()
    return kumo.make_throttle(name, '1/s'):delay_message_if_throttled(msg)
  end)
  return ok and delayed == true
end

local RESULTS = {
  Delivery = 'delivered',
  TransientFailure = 'deferred',
  Bounce = 'bounced',
  Feedback = 'complaint',
}

local function ip_of(record)
  local meta = record.meta or {}
  if type(meta.kiln_ip) == 'string' then
    return meta.kiln_ip
  end
  local source = record.source_address
  local address = type(source) == 'table' and source.address or nil
  if type(address) ~= 'string' then
    return nil
  end
  return address:match('^%[([^%]]+)%]:%d+$') or address:match('^([^:]+):%d+$')
end

--- should_enqueue_log_record (a log hook named in configure_log_hook, with meta
--- { 'kiln_ip' }): report deliveries, deferrals, bounces and complaints to kiln. Returns
--- false: the record has reached kiln and nothing is queued.
function kiln.report(msg)
  local record = msg:get_meta('log_record')
  local result = type(record) == 'table' and RESULTS[record.type] or nil
  local ip = result and ip_of(record)
  local domain = result and type(record.recipient) == 'string' and record.recipient:match('@([^@]+)$')
  if not (result and ip and domain) then
    return false
  end
  local args = { 'KILN.REPORT', ip, domain, result }
  local response = record.response or {}
  local content = tostring(response.content or '')
  -- KumoMTA's own failures (no connection, a timeout) are no receiver's reply: a deferral
  -- without a code, which no reply rule can act on.
  if type(response.code) == 'number' and not content:find('^KumoMTA internal') then
    local e = response.enhanced_code
    local enhanced = type(e) == 'table' and string.format('%d.%d.%d', e.class, e.subject, e.detail) or ''
    args[#args + 1] = tostring(response.code)
    args[#args + 1] = enhanced
    args[#args + 1] = content:sub(1, 512)
  end
  ask(unpack(args))
  return false
end

return kiln
