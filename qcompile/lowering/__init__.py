"""Graph lowering: recognise quantized matmul subgraphs and rewrite them to qcompile ops."""
