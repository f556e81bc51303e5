"""A prefork echo server written the way socket tutorials teach it: bind,
listen, fork, then each child blocks in accept() and echoes with
recv()/sendall() until the client closes. (The 64 KiB read size matches
prefork's and the C references', so the comparison is of the code around
the system calls, not of buffer sizes.)

python tutorial_prefork.py PORT WORKERS
"""

import os
import socket
import sys

port, workers = int(sys.argv[1]), int(sys.argv[2])
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(2048)
for _ in range(workers):
    if os.fork() == 0:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except ConnectionError:
                    pass  # the client reset the connection
print("ready", flush=True)
while True:
    os.wait()
