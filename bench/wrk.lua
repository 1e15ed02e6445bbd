-- wrk script for bench/run.py: cycles through the keys in a file (one per line, the first
-- argument after `--`), one pre-formatted request per key, and prints one JSON line at the end.
local requests_by_key = {}
local next_index = 0

function init(args)
  for key in io.lines(args[1]) do
    requests_by_key[#requests_by_key + 1] = wrk.format("GET", "/v1/items?page=2", {
      ["x-api-key"] = key,
      ["user-agent"] = "keygate-bench/1",
      ["accept"] = "application/json",
    })
  end
end

function request()
  next_index = next_index % #requests_by_key + 1
  return requests_by_key[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
