"""The model runner: scheduler output in, one jitted device step out."""
