"""kvrelay: rpc."""
