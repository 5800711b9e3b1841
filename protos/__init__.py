"""kvrelay: protos."""
