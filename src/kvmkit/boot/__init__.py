"""Loading guest kernels and programs: ELF, bzImage (Linux boot protocol), PVH."""
