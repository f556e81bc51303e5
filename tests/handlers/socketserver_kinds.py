"""socketserver request handlers, written as for socketserver itself."""

import socketserver


class Upper(socketserver.StreamRequestHandler):
    """Line by line through rfile and wfile."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


class Lifecycle(socketserver.BaseRequestHandler):
    """Reports what socketserver promises a handler: setup before handle,
    finish after it, the request, the client's address and the server."""

    def setup(self):
        self.events = ["setup"]

    def handle(self):
        data = self.request.recv(100)
        self.events.append("handle")
        facts = [
            data.decode(),
            ",".join(self.events),
            str(self.client_address == self.request.getpeername()),
            str(self.server.server_address == self.request.getsockname()),
            str(self.server.RequestHandlerClass is Lifecycle),
        ]
        self.request.sendall(" ".join(facts).encode())

    def finish(self):
        self.request.sendall(b" finish")
