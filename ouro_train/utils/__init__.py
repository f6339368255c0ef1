"""Small helpers shared by the library and the offline tools (data_tools imports from here, never the reverse)."""
