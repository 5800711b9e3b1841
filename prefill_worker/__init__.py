"""kvrelay: prefill_worker."""
