--[[
The parts of a KumoMTA policy (init.lua) that send through kiln (docs/integrations/kumomta.md).
Merge them into your own policy: listeners, spool, DKIM and logs stay as they are.

kiln renders the egress sources and pools and the shaping for its warming IPs:
    kiln render kumomta --daemon --watch --out /opt/kumomta/etc/policy/kiln
]]
local kumo = require 'kumo'
local sources = require 'policy-extras.sources'
local shaping = require 'policy-extras.shaping'
local kiln = require 'kiln'

-- kiln's Redis-protocol socket (kiln run --state-dir /var/lib/kiln).
local KILN = 'redis+unix:///var/lib/kiln/resp.sock'
kiln.setup { node = KILN, pool = 'main' }

-- Every IP of the plan as an egress source, each plan pool, and one pool per IP.
sources:setup { '/opt/kumomta/etc/policy/kiln/kiln-sources.toml' }

kumo.on('init', function()
  -- KumoMTA's throttles are kept in kiln (it answers CL.THROTTLE as redis-cell does), and
  -- the `kiln/IP/DOMAIN` throttles of kiln.throttle are kiln's warm-up caps.
  kumo.configure_redis_throttles { node = KILN }
  -- Each log record is offered to should_enqueue_log_record, which reports it to kiln.
  kumo.configure_log_hook { name = 'kiln', meta = { 'kiln_ip' } }
end)

-- The warming IPs' rates per provider, over KumoMTA's own shaping.
kumo.on('get_egress_path_config', shaping:setup {
  '/opt/kumomta/share/policy-extras/shaping.toml',
  '/opt/kumomta/etc/policy/kiln/kiln-shaping.toml',
})

-- Reception: kiln picks the IP (or says why the message must wait: 451).
kumo.on('smtp_server_message_received', function(msg)
  kiln.route(msg)
end)

-- A message kiln routed leaves through the pool of its one source.
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kiln.queue_config(domain, tenant) or kumo.make_queue_config {}
end)

-- Retries are held to the same caps: delayed by kiln's wait when there is no room.
kumo.on('throttle_insert_ready_queue', function(msg)
  kiln.throttle(msg)
end)

-- Deliveries, deferrals, bounces and complaints go back to kiln; nothing is queued.
kumo.on('should_enqueue_log_record', function(msg, hook_name)
  if hook_name == nil or hook_name == 'kiln' then
    return kiln.report(msg)
  end
  return false
end)
