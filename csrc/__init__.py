"""The C++/CUDA sources, shipped with the package so the extensions can be compiled on first use."""
