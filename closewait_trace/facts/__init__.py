"""The sources of facts beside the BPF events, and the records they produce.

Readers of /proc and sock_diag (enrich), of who holds a socket and how it waits (holders), of
cgroups and container runtimes (containers), and of network namespaces (netns), plus the fact
record types the pipeline joins onto connections (facts). Nothing here loads BPF.
"""
