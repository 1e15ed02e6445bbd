"""A key service for the end-to-end tests: stock nginx (Debian's) serving a directory of static
JSON files on a loopback port, the way any web server or object store would serve keygate's
key-set documents. Nothing here knows about keys: the tests write files, nginx serves them (with
its own ETag / If-None-Match handling), and its access log tells how often keygate asked.
"""
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from keygate_stack import wait_for_port


_next_serial = itertools.count(1)


def key_record(key_id, secret, **fields):
    """A key record as a key service publishes it: the digest of the secret, never the secret."""
    return {"id": key_id, "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


def keyset_document(*records, serial=None):
    """A key-set document as `keygate keyset` publishes it: each new one gets a higher serial
    (keygate refuses a document whose serial is not above the one it holds)."""
    return {"serial": next(_next_serial) if serial is None else serial, "keys": list(records)}


def write_digest_shards(root, records):
    """Key records, (hex digest, record JSON text) pairs, as the static-file layout for big
    stores in lookup on miss: /keys/shards/<first 3 hex digits of the digest>.json, 4096 files
    however many keys (a file per key would be a million inodes). Returns (records, files)."""
    shards = {}
    for digest, text in records:
        shards.setdefault(digest[:3], []).append(text)
    folder = Path(root) / "keys" / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, texts in shards.items():
        (folder / f"{prefix}.json").write_text('{"keys":[' + ",".join(texts) + "]}")
    return sum(len(t) for t in shards.values()), len(shards)


def nginx_binary():
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise RuntimeError("nginx is needed for the key-service tests (make keyservice-tools installs "
                           "Debian's nginx-light)")
    return found


class StaticKeyService:
    def __init__(self, root, port, workdir):
        self.root = Path(root)
        self.port = port
        self.workdir = Path(workdir) / f"nginx-{port}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.access_log = self.workdir / "access.log"
        self.proc = None
        self._mtime = time.time()

    def config(self):
        w = self.workdir
        temp = "\n".join(f"  {d}_temp_path {w}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log {self.access_log};
{temp}
  default_type application/json;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
  }}
}}
"""

    def start(self):
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen([nginx_binary(), "-e", str(self.workdir / "error.log"),
                                      "-p", str(self.workdir), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not wait_for_port(self.port, 10):
            raise RuntimeError("nginx did not start:\n" + (self.workdir / "error.log").read_text()[-2000:])
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @classmethod
    def for_stack(cls, stack):
        """The key service a shipped config's `keyservice` cluster points at: the stack's key
        port, serving files under the stack's work directory."""
        return cls(stack.workdir / "keyservice", stack.ports["keys"], stack.workdir)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def write(self, relative, content):
        """Replaces a served file atomically (temp file + rename), so nginx never serves half a
        file, with a fresh modification time: nginx's ETag is mtime + size, and a document
        rewritten within the same second at the same size must still get a new ETag."""
        self.stage(relative, content)()

    def stage(self, relative, content):
        """Writes the next content of a served file aside; the function returned publishes it
        (the rename of `write`). A bench stages a large document before its measured window, so
        the window holds the publish only, not Python building and writing 100 MB."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content if isinstance(content, bytes) else (
            content if isinstance(content, str) else json.dumps(content)).encode()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)

        def publish():
            self._mtime = max(self._mtime + 1, time.time())
            os.utime(tmp, (self._mtime, self._mtime))
            os.replace(tmp, path)
        return publish

    def remove(self, relative):
        (self.root / relative).unlink(missing_ok=True)

    def requests(self, path_prefix=""):
        """Requests nginx logged whose path starts with `path_prefix`: (path, status)."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            try:
                request = line.split('"')[1]
                status = int(line.split('"')[2].split()[0])
            except (IndexError, ValueError):
                continue
            parts = request.split()
            if len(parts) >= 2 and parts[1].startswith(path_prefix):
                out.append((parts[1], status))
        return out
