"""qreformulate model pipeline: tokenizer, training, ONNX export, int8 quantization, evaluation."""
