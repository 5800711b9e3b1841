"""The decode kernels: paged attention and the KV-cache write, each an op with a
torch path and a Triton kernel, behind the contracts in `contracts`."""
