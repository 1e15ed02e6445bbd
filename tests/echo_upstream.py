#!/usr/bin/env python3
"""An upstream that answers every request with the request it received, as JSON.

Used by `make run` and the end-to-end tests, so a user (and a test) can see exactly which
headers reached the service: the trusted scope headers, and that the credential was stripped.
"""
import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    server_version = "keygate-echo"
    protocol_version = "HTTP/1.1"

    def _read_chunked_body(self):
        """Reads a chunked body to its end (trailers included), as a server acting on a body would
        before answering."""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            self.rfile.read(size + 2)  # the chunk and its CRLF
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        elif "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            self._read_chunked_body()
        body = json.dumps(
            {
                "upstream": self.server.upstream_name,
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _answer

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--name", default="echo")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Echo)
    server.upstream_name = args.name
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
