-- wrk script for tests/soak.py: rotates through valid and invalid credentials of every scheme
-- of envoy/demo.yaml, stops each thread after SOAK_REQUESTS_PER_THREAD responses, and prints
-- the status counts of all threads as one JSON line ("SOAK_SUMMARY {...}"). wrk itself runs for
-- its whole -d, so each thread that is done writes a marker file into SOAK_DONE_DIR and
-- tests/soak.py then stops wrk with SIGINT (wrk still runs done() and prints the summary).

local OPAQUE = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"
local ID_SECRET = "abk_demo:demo_secret_b64url_Zm9vYmFy"
local MIX = {
  -- valid, every scheme
  { path = "/payments", headers = { ["x-api-key"] = OPAQUE } },
  { path = "/payments", headers = { ["authorization"] = "Bearer " .. ID_SECRET } },
  { path = "/payments", headers = { ["x-makecrypto-key-id"] = "mk_makepay_demo",
                                    ["x-makecrypto-key-secret"] = "mksec_demo_9c1f0e7a5b3d" } },
  { path = "/admin/users", headers = { ["x-api-key"] = "cmp_readonly_Zx5cV7bNm2Qw9ErT" } },
  { path = "/healthz", headers = { ["x-keygate-tenant"] = "forged" } },
  -- invalid: unknown, wrong secret, expired, disabled, malformed, missing, conflicting, forbidden
  { path = "/payments", headers = { ["x-api-key"] = "cmp_unknown_Zq1Wx2Ec3Rv4Tb5" } },
  { path = "/payments", headers = { ["authorization"] = "Bearer abk_demo:d3Jvbmctc2VjcmV0" } },
  { path = "/payments", headers = { ["x-api-key"] = "cmp_expired_Lk3pQ9sVx2Rm7TbN" } },
  { path = "/payments", headers = { ["x-api-key"] = "cmp_disabled_Hq8wE4tYu6Io1PzX" } },
  { path = "/payments", headers = { ["x-api-key"] = "sk_live_Mx9Nc8Bv7Cx6Zl5Kj4" } },
  { path = "/payments", headers = {} },
  { path = "/payments", headers = { ["x-api-key"] = OPAQUE, ["authorization"] = "Bearer " .. ID_SECRET } },
  { path = "/admin/users", headers = { ["x-api-key"] = OPAQUE } },
  { path = "/payments", headers = { ["x-makecrypto-key-id"] = "mk_makepay_demo" } },
}

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  limit = tonumber(os.getenv("SOAK_REQUESTS_PER_THREAD") or "1000")
  done_count = 0
  next_index = 0
  statuses = {}
  requests = {}
  for i, item in ipairs(MIX) do
    requests[i] = wrk.format("GET", item.path, item.headers)
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  done_count = done_count + 1
  if done_count == limit then
    -- wrk runs for its whole -d; tell soak.py this thread is done so it can stop wrk (SIGINT).
    local marker = io.open(os.getenv("SOAK_DONE_DIR") .. "/" .. tostring(id), "w")
    marker:write(tostring(done_count))
    marker:close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests_)
  local total, parts = 0, {}
  local merged = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for status, count in pairs(counts) do
      merged[status] = (merged[status] or 0) + count
      total = total + count
    end
  end
  for status, count in pairs(merged) do
    table.insert(parts, string.format('"%s": %d', status, count))
  end
  io.write(string.format('SOAK_SUMMARY {"requests": %d, "statuses": {%s}}\n', total, table.concat(parts, ", ")))
end
