"""ONNX frontend: safe I/O, graph index, constant evaluation, rewrite rules, conversion driver."""
