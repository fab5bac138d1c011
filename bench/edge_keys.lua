-- wrk script for bench.edge: POSTs the same small JSON body, rotating customers' keys
-- (one per line in the file named by the first argument), and prints one JSON line.
-- wrk -t1 -c16 -d5s -s bench/edge_keys.lua URL -- KEYS_FILE PATH BODY
local prepared = {}
local next_one = 0

function init(args)
  local file = assert(io.open(args[1]))
  for key in file:lines() do
    local headers = { ["Content-Type"] = "application/json", ["X-API-Key"] = key }
    prepared[#prepared + 1] = wrk.format("POST", args[2], headers, args[3])
  end
  file:close()
end

function request()
  next_one = next_one % #prepared + 1
  return prepared[next_one]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
