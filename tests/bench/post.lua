-- wrk script: POST a ~1 KB chat completion (answered with ~1 KB) as one of 1000 users.
-- The requests are formatted once in init(), so varying x-user-id costs wrk nothing.
-- done() prints one line, "BENCH_JSON {...}", that tests/bench/run.py reads.

local n_users = 1000
local prepared = {}
local next_index = 0

local function chat_body()
  local words = string.rep("the quick brown fox jumps over the lazy dog ", 20)
  return '{"model":"fake-model","max_tokens":120,"stream":false,"messages":['
    .. '{"role":"system","content":"You are a helpful assistant."},'
    .. '{"role":"user","content":"' .. words .. '"}]}'
end

function init(args)
  local body = chat_body()
  for i = 1, n_users do
    prepared[i] = wrk.format("POST", "/v1/chat/completions", {
      ["Content-Type"] = "application/json",
      ["x-user-id"] = "user-" .. i,
    }, body)
  end
end

function request()
  next_index = next_index % n_users + 1
  return prepared[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
