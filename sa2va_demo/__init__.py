"""The tiny Sa2VA-shaped model, data and converter used by the demo and the tests."""
