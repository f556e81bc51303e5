"""The echo server a gevent user would write: gevent.server.StreamServer,
a greenlet per connection on one libev loop.

python gevent_echo.py PORT
"""

import sys

from gevent.server import StreamServer


def echo(sock, address):
    while data := sock.recv(65536):
        sock.sendall(data)


server = StreamServer(("127.0.0.1", int(sys.argv[1])), echo, backlog=2048)
server.init_socket()
print("ready", flush=True)
server.serve_forever()
