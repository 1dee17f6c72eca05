"""The quickstart's example app: answers every GET with a greeting, its job and host."""

import http.server
import os

JOB = os.environ.get("JOB_ID", "?")
GREETING = os.environ.get("GREETING", "Hello from flynnp2p")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{GREETING}: job {JOB} of {os.environ.get('APP_NAME', '?')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "5000"))
    print(f"hello: job {JOB} listening on port {port}", flush=True)
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
