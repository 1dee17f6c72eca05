"""A small static web server for the files of the app directory (the cwd).

Listens on $HOST (any address when unset) and $PORT. Serves regular files;
a directory serves its index.html; no directory listings, and nothing whose
path has a segment starting with "." (.profile.d, .flynnp2p, .git).
"""

import http.server
import os
import socket
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):  # type: ignore[no-untyped-def]
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if any(seg.startswith(".") for seg in path.split("/") if seg):
            self.send_error(404)
            return None
        return super().send_head()

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(404)
        return None

    def log_message(self, format, *args):  # type: ignore[no-untyped-def]
        sys.stdout.write(f"{self.address_string()} {format % args}\n")
        sys.stdout.flush()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    host = os.environ.get("HOST") or ""
    port = int(os.environ.get("PORT", "5000"))
    if ":" in host:
        Server.address_family = socket.AF_INET6
    with Server((host, port), Handler) as server:
        print(f"static site on {host or '*'}:{port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
