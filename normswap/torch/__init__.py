"""PyTorch frontend: module walker, dataflow pairing (torch.fx), module factories, calibration and distillation,
export for validation. Imported only when a torch module is converted or inspected."""
