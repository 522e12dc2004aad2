-- wrk script: POST the body in $BENCH_BODY (or the file $BENCH_BODY_FILE), then write
-- the whole latency histogram (microseconds) and the counters to $BENCH_OUT as JSON,
-- so runs can be merged.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
if os.getenv("BENCH_BODY_FILE") then
  local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
  wrk.body = f:read("*a")
  f:close()
end
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local f = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  local e = summary.errors
  f:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors": ' ..
    '{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, "hist": [',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, #latency do
    local value, count = latency(i)
    if i > 1 then f:write(",") end
    f:write(string.format("[%d,%d]", value, count))
  end
  f:write("]}\n")
  f:close()
end
