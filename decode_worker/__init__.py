"""kvrelay: decode_worker."""
