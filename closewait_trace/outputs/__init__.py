"""The outputs: what leaves the tracer for a person or another program.

The terminal, plain and JSON renderers (render), the Prometheus exporter and health endpoints
(metrics), recordings to replay later (record), and the one function that makes untrusted text
(process names, paths) safe to print (textsafe).
"""
