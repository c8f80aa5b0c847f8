"""The faces: what people use — the command line (classify files, terminal chat) and the app's helpers.

They use only the runtime's public API (`allinone_gguf.runtime`).
"""
