"""The pipeline: from events and facts to diagnoses.

Events are joined into connections (join), host facts are attached to them (enrichment), each
connection stuck in CLOSE_WAIT gets a cause and a confidence (diagnose), and the story of one
connection can be laid out as a timeline (timeline). Pure userspace, testable without a kernel.
"""
