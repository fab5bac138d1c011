-- wrk script for the benchmarks' flat-out runs (bench.wrk_load): the same request each
-- time but for one header, whose values (one per line in the file named by the first
-- argument: customers' keys, say) it rotates; prints one JSON line.
-- wrk -t1 -c16 -d5s -s bench/wrk_requests.lua URL -- VALUES_FILE PATH BODY METHOD HEADER
-- An empty BODY sends none (a GET).
local prepared = {}
local next_one = 0

function init(args)
  local body, method, header = args[3], args[4], args[5]
  if body == "" then body = nil end
  local file = assert(io.open(args[1]))
  for value in file:lines() do
    local headers = { [header] = value }
    if body then headers["Content-Type"] = "application/json" end
    prepared[#prepared + 1] = wrk.format(method, args[2], headers, body)
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
