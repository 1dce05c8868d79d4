--[[
Runs the policy in contrib/kumomta/policy.lua under tests/kumomta/shim.lua, one command per
line of standard input, one answer per line of standard output (tab-separated):

  msg ID ADDRESS[,ADDRESS...]  reception (several: an SMTP batch), queue config and the first
                      ready-queue insertion
                      -> ID routed IP POOL DELAYED | ID rejected CODE TEXT
  retry ID            another ready-queue insertion (a retry) -> ID retry DELAYED DUE_S
  log ID TYPE [CODE ENHANCED TEXT...]  a log record of message ID -> ID logged QUEUED
  now S               the shim's clock, in seconds
]]
io.stdout:setvbuf('line')
local shim = require 'shim'
local policy = assert(os.getenv('KILN_POLICY'), 'KILN_POLICY: the policy file to run')
local kiln_node = assert(os.getenv('KILN_NODE'), 'KILN_NODE: kiln\'s socket as a URL')

-- The policy names its socket; the test's daemon has its own.
local source = assert(io.open(policy)):read('*a')
source = source:gsub("redis%+unix:///var/lib/kiln/resp%.sock", kiln_node)
assert(loadstring(source, '@' .. policy))()
shim.handlers.init()

local messages = {}

for line in io.lines() do
  local words = {}
  for w in line:gmatch('%S+') do
    words[#words + 1] = w
  end
  local op, id = words[1], words[2]
  if op == 'msg' then
    local msg = shim.message(words[3])
    messages[id] = msg
    local ok, code, text = shim.fire('smtp_server_message_received', msg)
    if not ok then
      print(table.concat({ id, 'rejected', code, text }, '\t'))
    else
      local _, qconf = shim.fire('get_queue_config', msg.rcpt.domain, msg.meta.tenant, nil, nil)
      local _, delayed = shim.fire('throttle_insert_ready_queue', msg)
      print(table.concat({ id, 'routed', tostring(msg.meta.kiln_ip), tostring(qconf.egress_pool),
        tostring(msg.due ~= nil) }, '\t'))
    end
  elseif op == 'retry' then
    local msg = messages[id]
    msg.due = nil
    shim.fire('throttle_insert_ready_queue', msg)
    print(table.concat({ id, 'retry', tostring(msg.due ~= nil), tostring(msg.due or '-') }, '\t'))
  elseif op == 'log' then
    local msg = messages[id]
    local record = { type = words[3], recipient = msg.rcpt.address, meta = { kiln_ip = msg.meta.kiln_ip } }
    if words[4] then
      local class, subject, detail = words[5]:match('^(%d)%.(%d+)%.(%d+)$')
      record.response = {
        code = tonumber(words[4]),
        enhanced_code = class and { class = tonumber(class), subject = tonumber(subject), detail = tonumber(detail) },
        content = table.concat(words, ' ', 6),
      }
    end
    local log_msg = shim.message(msg.rcpt.address)
    log_msg:set_meta('log_record', record)
    local _, queued = shim.fire('should_enqueue_log_record', log_msg, 'kiln')
    print(table.concat({ id, 'logged', tostring(queued) }, '\t'))
  elseif op == 'now' then
    shim.now = tonumber(id)
  else
    error('unknown command ' .. line)
  end
end
