#!/usr/bin/env python3
"""A webhook collector for turn-control's accounting tests, built on Python's http.server
(a server we did not write, speaking HTTP/1.1 with keep-alive).

Usage: webhook_server.py DIR

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
"""

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIR = sys.argv[1]
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
        super().setup()
        append("connections", str(self.client_address).encode())

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


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    server.daemon_threads = True
    with open(path("port.tmp"), "w") as file:
        file.write(str(server.server_address[1]))
    os.replace(path("port.tmp"), path("port"))
    server.serve_forever()


if __name__ == "__main__":
    main()
