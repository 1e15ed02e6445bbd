#!/usr/bin/env bash
# The README's curl examples for envoy/demo.yaml, as checks: each request's status, the keygate
# error `code`, and what the echo upstream received (scope headers present, credential gone).
#
#   tests/curl_suite.sh [--wait SECONDS] BASE_URL [ADMIN_URL]
#
# BASE_URL is keygate's listener (http://127.0.0.1:10000 for `make run` and `make compose-up`);
# with ADMIN_URL the keygate counters are read before and after and must move by exactly what
# the suite sent. Used by `make compose-test` and by tests/e2e/test_curl_suite.py against
# `make run`'s local stack, so both stacks are held to the same examples.
# STATS_NAMESPACE is the prefix Envoy gives keygate's counters: wasmcustom (keygate.wasm, the
# default) or dynamicmodulescustom (libkeygate.so).
set -uo pipefail

wait_seconds=0
if [ "${1:-}" = "--wait" ]; then
  wait_seconds=$2
  shift 2
fi
if [ $# -lt 1 ]; then
  echo "usage: $0 [--wait SECONDS] BASE_URL [ADMIN_URL]" >&2
  exit 2
fi
base=${1%/}
admin=${2:-}
admin=${admin%/}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
passed=0
failed=0
status=""

CMP_KEY='cmp_demo_Q7fX2mLr9Wk4TbVn8PzA'
ABK_TOKEN='abk_demo:demo_secret_b64url_Zm9vYmFy'
MK_ID='mk_makepay_demo'
MK_SECRET='mksec_demo_9c1f0e7a5b3d'

# request METHOD PATH [curl args...]: sets $status; body in $scratch/body, headers in $scratch/headers.
request() {
  local method=$1 path=$2
  shift 2
  status=$(curl -sS -o "$scratch/body" -D "$scratch/headers" -w '%{http_code}' \
    -X "$method" "$base$path" "$@") || status="curl-failed"
}

ok() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() {
  failed=$((failed + 1))
  echo "FAIL - $1"
  echo "       status: $status"
  echo "       body:   $(head -c 400 "$scratch/body" 2>/dev/null)"
}

# check NAME STATUS [+text the body must contain | -text it must not contain | h:header line]...
check() {
  local name=$1 want=$2
  shift 2
  if [ "$status" != "$want" ]; then
    fail "$name (want status $want)"
    return
  fi
  local expectation
  for expectation in "$@"; do
    case "$expectation" in
      +*) grep -qF -- "${expectation#+}" "$scratch/body" \
            || { fail "$name (body lacks ${expectation#+})"; return; } ;;
      -*) if grep -qF -- "${expectation#-}" "$scratch/body"; then
            fail "$name (body must not contain ${expectation#-})"; return
          fi ;;
      h:*) tr -d '\r' < "$scratch/headers" | grep -qiF -- "${expectation#h:}" \
            || { fail "$name (no response header '${expectation#h:}')"; return; } ;;
    esac
  done
  ok "$name"
}

counter() { # counter NAME: a keygate counter from the admin, 0 when absent
  local value
  value=$(curl -sS "$admin/stats?filter=keygate" | tr -d '\r' \
    | awk -v name="${STATS_NAMESPACE:-wasmcustom}.keygate.demo.$1" -F': ' '$1 == name { print $2 }')
  echo "${value:-0}"
}

if [ "$wait_seconds" -gt 0 ]; then
  deadline=$((SECONDS + wait_seconds))
  until curl -s -o /dev/null "$base/healthz"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "keygate did not answer at $base within ${wait_seconds}s" >&2
      exit 1
    fi
    sleep 1
  done
fi

if [ -n "$admin" ]; then
  allowed_before=$(counter allowed)
  denied_before=$(counter denied)
  missing_before=$(counter denied.token_missing)
fi

request GET /payments
check "no key: 401 TOKEN_MISSING with WWW-Authenticate" 401 \
  '+"code":"TOKEN_MISSING"' 'h:content-type: application/json' 'h:www-authenticate: ApiKey realm="keygate"'

request GET /payments -H "x-api-key: $CMP_KEY"
check "opaque key in x-api-key: 200, scope headers upstream, key stripped" 200 \
  '+"upstream": "echo"' '+["x-keygate-auth", "api_key"]' '+["x-keygate-key-id", "cmp_demo"]' \
  '+["x-keygate-tenant", "acme"]' '+["x-keygate-permissions", "compress"]' \
  '-"x-api-key"' "-$CMP_KEY"

request GET /payments -H "Authorization: Bearer $ABK_TOKEN"
check "<key id>:<secret> Bearer token: 200, user scope, authorization stripped" 200 \
  '+["x-keygate-key-id", "abk_demo"]' '+["x-keygate-tenant", "company-7"]' \
  '+["x-keygate-user", "owner@company-7"]' '-"authorization"' '-demo_secret_b64url_Zm9vYmFy'

request GET /payments -H "x-makecrypto-key-id: $MK_ID" -H "x-makecrypto-key-secret: $MK_SECRET"
check "key id + secret headers: 200, product scope, both headers stripped" 200 \
  '+["x-keygate-key-id", "mk_makepay_demo"]' '+["x-keygate-tenant", "team-3"]' \
  '+["x-keygate-product", "makepay"]' '-"x-makecrypto-key-secret"' '-"x-makecrypto-key-id"' \
  "-$MK_SECRET"

request GET /payments -H 'Authorization: Bearer abk_demo:wrong'
check "wrong secret: 401 INVALID_API_KEY" 401 '+"code":"INVALID_API_KEY"' '-"upstream"'

request GET /payments -H 'x-api-key: sk_live_abc'
check "unknown prefix: 401 MALFORMED_API_KEY" 401 '+"code":"MALFORMED_API_KEY"' '-"upstream"'

request GET /payments -H "x-api-key: $CMP_KEY" -H "Authorization: Bearer $ABK_TOKEN"
check "two different credentials: 401 CONFLICTING_CREDENTIALS" 401 \
  '+"code":"CONFLICTING_CREDENTIALS"' '-"upstream"'

request GET /admin/users -H "x-api-key: $CMP_KEY"
check "key without the admin permission: 403 FORBIDDEN" 403 '+"code":"FORBIDDEN"' '-"upstream"'

request GET /healthz -H 'x-keygate-tenant: spoofed'
check "public route: 200 without a key, client-sent scope header removed" 200 \
  '+"path": "/healthz"' '+["x-keygate-auth", "none"]' '-spoofed'

if [ -n "$admin" ]; then
  allowed_delta=$(( $(counter allowed) - allowed_before ))
  denied_delta=$(( $(counter denied) - denied_before ))
  missing_delta=$(( $(counter denied.token_missing) - missing_before ))
  status="allowed +$allowed_delta, denied +$denied_delta, denied.token_missing +$missing_delta"
  echo "" > "$scratch/body"
  if [ "$allowed_delta" = 4 ] && [ "$denied_delta" = 5 ] && [ "$missing_delta" = 1 ]; then
    ok "admin stats: $status"
  else
    fail "admin stats (want allowed +4, denied +5, denied.token_missing +1)"
  fi
fi

echo "curl suite against $base: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
