"""The standard library's threaded echo server: socketserver.ThreadingTCPServer,
a thread per connection.

python socketserver_echo.py PORT
"""

import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 2048


with Server(("127.0.0.1", int(sys.argv[1])), Echo) as server:
    print("ready", flush=True)
    server.serve_forever()
