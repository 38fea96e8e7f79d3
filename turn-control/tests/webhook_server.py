#!/usr/bin/env python3
"""A webhook collector for turn-control's accounting tests, built on Python's http.server
(a server we did not write, speaking HTTP/1.1 with keep-alive).

Usage: webhook_server.py DIR [--tls CERT KEY]

Listens on 127.0.0.1 on a port the system picks and writes that port to DIR/port once
listening. For each request it reads DIR/mode (missing = "ok"):

  ok      answer 200 and append the body, one line, to DIR/received
  fail    answer 503
  reject  answer 422
  stall   read the request and never answer; close the connection once the mode changes

A body is recorded only when it is answered 2xx, so a request the client gave up on is
never counted as received. Each new connection appends a line to DIR/connections; a
request without `Content-Type: application/json` or with a body that is not one line is
answered 400 and appended to DIR/protocol_errors.

With --tls it speaks HTTPS: Python's ssl module serves the certificate chain in the PEM file
CERT with the key in KEY. Each connection's handshake runs in its own thread; one that fails
(the client did not trust the certificate) appends the reason to DIR/tls_errors.
"""

import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIR = sys.argv[1]
TLS = None
if sys.argv[2:3] == ["--tls"] and len(sys.argv) == 5:
    TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TLS.load_cert_chain(sys.argv[3], sys.argv[4])
elif len(sys.argv) != 2:
    sys.exit(__doc__)
WRITE_LOCK = threading.Lock()


def path(name):
    return os.path.join(DIR, name)


def append(name, data):
    with WRITE_LOCK:
        with open(path(name), "ab") as file:
            file.write(data + b"\n")
            file.flush()


def mode():
    try:
        with open(path("mode")) as file:
            return file.read().strip() or "ok"
    except FileNotFoundError:
        return "ok"


class Collector(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        if TLS is not None:
            try:
                self.request = TLS.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError) as error:
                append("tls_errors", str(error).encode())
                raise
        super().setup()
        append("connections", str(self.client_address).encode())

    def finish(self):
        super().finish()
        if TLS is not None:
            # The wrapped socket took over the connection: socketserver closes only the
            # original, now detached one.
            self.request.close()

    def answer(self, status):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        current = mode()
        if current == "stall":
            while mode() == "stall":
                time.sleep(0.02)
            self.close_connection = True
            return
        if self.headers.get("Content-Type") != "application/json" or b"\n" in body:
            append("protocol_errors", self.requestline.encode() + b" " + body)
            self.answer(400)
        elif current == "fail":
            self.answer(503)
        elif current == "reject":
            self.answer(422)
        else:
            # Recorded before the answer: once the client sees 200, the body is on file.
            append("received", body)
            self.answer(200)

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A failed TLS handshake is on file (DIR/tls_errors): keep the test output quiet.
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            super().handle_error(request, client_address)


def main():
    server = Server(("127.0.0.1", 0), Collector)
    with open(path("port.tmp"), "w") as file:
        file.write(str(server.server_address[1]))
    os.replace(path("port.tmp"), path("port"))
    server.serve_forever()


if __name__ == "__main__":
    main()
