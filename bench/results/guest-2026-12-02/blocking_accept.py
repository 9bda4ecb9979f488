"""N threads blocked in accept() on one listener at once, then N connections: each thread
accepts one, closes it. Prints how many were accepted."""
import socket, sys, threading, time

n = int(sys.argv[1])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(128)
port = ls.getsockname()[1]
got: list[int] = []
lock = threading.Lock()

def worker() -> None:
    c, _ = ls.accept()
    with lock:
        got.append(1)
    c.close()

threads = [threading.Thread(target=worker) for _ in range(n)]
for t in threads:
    t.start()
time.sleep(3)  # all N now sleep inside inet_csk_accept
clients = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    clients.append(s)
for t in threads:
    t.join()
for s in clients:
    s.close()
ls.close()
print(f"blocked accept threads {n}: accepted {len(got)}", flush=True)
