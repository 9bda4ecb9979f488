"""Stand-in guest tests proving the VM runner works; see ../README.md."""
