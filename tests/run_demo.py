#!/usr/bin/env python3
"""`make run`: Envoy with a shipped config on its shipped ports, an echo upstream, and curl
examples. Ctrl-C (or a SIGTERM to this script) stops everything."""
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keygate_stack import ENVOY_BIN, ROOT, SHIPPED_PORTS, wait_for_port  # noqa: E402
from static_keyservice import StaticKeyService  # noqa: E402

EXAMPLES = """
keygate is listening on http://localhost:10000 (Envoy admin: http://localhost:9901/stats?filter=keygate)

  # no key: 401 TOKEN_MISSING
  curl -i localhost:10000/payments
  # opaque key in x-api-key: 200, the echo upstream shows x-keygate-* scope headers, no x-api-key
  curl -s localhost:10000/payments -H 'x-api-key: cmp_demo_Q7fX2mLr9Wk4TbVn8PzA'
  # <key id>:<secret> as a Bearer token: 200
  curl -s localhost:10000/payments -H 'Authorization: Bearer abk_demo:demo_secret_b64url_Zm9vYmFy'
  # key id and secret in two headers: 200
  curl -s localhost:10000/payments -H 'x-makecrypto-key-id: mk_makepay_demo' -H 'x-makecrypto-key-secret: mksec_demo_9c1f0e7a5b3d'
  # wrong secret: 401 INVALID_API_KEY
  curl -s localhost:10000/payments -H 'Authorization: Bearer abk_demo:wrong'
  # wrong prefix: 401 MALFORMED_API_KEY
  curl -s localhost:10000/payments -H 'x-api-key: sk_live_abc'
  # public route, no key needed
  curl -s localhost:10000/healthz
"""


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # same clean-up as Ctrl-C: no Envoy left holding port 10000


def main():
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    config = Path(sys.argv[1] if len(sys.argv) > 1 else "envoy/demo.yaml")
    # Configs with a key service get nginx serving envoy/keyservice/ on the shipped port.
    key_service = None
    if f"port_value: {SHIPPED_PORTS['keys']} " in config.read_text():
        key_service = StaticKeyService(ROOT / "envoy" / "keyservice", SHIPPED_PORTS["keys"],
                                       ROOT / ".tmp" / "run-keyservice").start()
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "tests/echo_upstream.py"), "--port", "8081"]),
        subprocess.Popen([sys.executable, str(ROOT / "tests/echo_upstream.py"), "--port", "8082", "--name", "sandbox"]),
        subprocess.Popen([ENVOY_BIN, "-c", str(config), "--concurrency", "2", "--disable-hot-restart",
                          "--log-level", "info"], cwd=ROOT),
    ]
    try:
        if not wait_for_port(10000, 30):
            print("Envoy did not start; see its log above.", file=sys.stderr)
            return 1
        time.sleep(0.3)
        print(EXAMPLES if config.name == "demo.yaml" else f"\n{config} is listening on http://localhost:10000; see README.md for its curl examples.\n", flush=True)
        procs[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        if key_service:
            key_service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
