"""A small, bounds-checked ELF reader (ELF32 and ELF64, little-endian).

Used for tiny test guests (segments and symbols) and for `vmlinux` (PT_LOAD segments and the
PVH entry note). Every offset and size read from the file is checked against the file length:
a malformed file raises `ElfError`, it never reads past the data.
Reference: System V ABI, "Object Files" (the ELF specification).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD = 1
PT_NOTE = 4
SHT_SYMTAB = 2
SHT_NOTE = 7
ELFCLASS32 = 1
ELFCLASS64 = 2
EM_386 = 3
EM_X86_64 = 62


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


class ElfFile:
    def __init__(self, data: bytes) -> None:
        self.data = data
        if len(data) < 16 or data[:4] != b"\x7fELF":
            raise ElfError("not an ELF file (bad magic)")
        self.elf_class = data[4]
        if self.elf_class not in (ELFCLASS32, ELFCLASS64):
            raise ElfError(f"unsupported ELF class {self.elf_class}")
        if data[5] != 1:
            raise ElfError("only little-endian ELF files are supported")
        self.is64 = self.elf_class == ELFCLASS64
        if self.is64:
            hdr = self._unpack("<HHIQQQIHHHHHH", 16)
        else:
            hdr = self._unpack("<HHIIIIIHHHHHH", 16)
        (
            self.type, self.machine, _version, self.entry, self.phoff, self.shoff, _flags,
            _ehsize, self.phentsize, self.phnum, self.shentsize, self.shnum, self.shstrndx,
        ) = hdr  # fmt: skip
        self.segments = self._read_segments()

    def _unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.data):
            raise ElfError(f"truncated ELF file (need {size} bytes at offset {offset:#x})")
        return struct.unpack_from(fmt, self.data, offset)

    def _slice(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ElfError(f"ELF range {offset:#x}+{size:#x} is outside the file")
        return self.data[offset : offset + size]

    def _read_segments(self) -> list[Segment]:
        segments = []
        fmt = "<IIQQQQQQ" if self.is64 else "<IIIIIIII"
        need = struct.calcsize(fmt)
        if self.phnum and self.phentsize < need:
            raise ElfError(f"program header entries of {self.phentsize} bytes are too small")
        for i in range(self.phnum):
            raw = self._unpack(fmt, self.phoff + i * self.phentsize)
            if self.is64:
                p_type, flags, offset, vaddr, paddr, filesz, memsz, _align = raw
            else:
                p_type, offset, vaddr, paddr, filesz, memsz, flags, _align = raw
            if p_type == PT_LOAD:
                if filesz > memsz:
                    raise ElfError(f"segment {i}: file size {filesz:#x} > memory size {memsz:#x}")
                self._slice(offset, filesz)  # bounds check
            segments.append(Segment(p_type, offset, vaddr, paddr, filesz, memsz, flags))
        return segments

    @property
    def load_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.type == PT_LOAD]

    def segment_data(self, seg: Segment) -> bytes:
        return self._slice(seg.offset, seg.filesz)

    def _sections(self) -> list[tuple[int, int, int, int, int, int]]:
        """(name, type, offset, size, link, entsize) of each section."""
        fmt = "<IIQQQQIIQQ" if self.is64 else "<IIIIIIIIII"
        need = struct.calcsize(fmt)
        if self.shnum and self.shentsize < need:
            raise ElfError(f"section header entries of {self.shentsize} bytes are too small")
        out = []
        for i in range(self.shnum):
            raw = self._unpack(fmt, self.shoff + i * self.shentsize)
            name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize = raw
            out.append((name, sh_type, offset, size, link, entsize))
        return out

    def notes(self) -> list[Note]:
        """Notes from PT_NOTE segments, or from SHT_NOTE sections if there are none."""
        ranges = [(s.offset, s.filesz) for s in self.segments if s.type == PT_NOTE]
        if not ranges:
            ranges = [(off, size) for _n, t, off, size, _l, _e in self._sections() if t == SHT_NOTE]
        notes = []
        for offset, size in ranges:
            blob = self._slice(offset, size)
            pos = 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
                pos += 12
                name_end = pos + namesz
                desc_start = pos + ((namesz + 3) & ~3)
                desc_end = desc_start + descsz
                if desc_end > len(blob) or name_end > len(blob):
                    raise ElfError("truncated ELF note")
                name = blob[pos:name_end].rstrip(b"\0")
                notes.append(Note(name, ntype, blob[desc_start:desc_end]))
                pos = desc_start + ((descsz + 3) & ~3)
        return notes

    def symbols(self) -> dict[str, int]:
        """Symbol name -> value from the symbol table (empty if the file is stripped)."""
        sections = self._sections()
        result: dict[str, int] = {}
        for _name, sh_type, offset, size, link, entsize in sections:
            if sh_type != SHT_SYMTAB:
                continue
            if not 0 <= link < len(sections):
                raise ElfError("symbol table links to a missing string table")
            _n, _t, str_off, str_size, _l, _e = sections[link]
            strtab = self._slice(str_off, str_size)
            fmt = "<IBBHQQ" if self.is64 else "<IIIBBH"
            ent = struct.calcsize(fmt)
            if entsize < ent:
                raise ElfError("symbol table entries too small")
            table = self._slice(offset, size)
            for pos in range(0, len(table) - ent + 1, entsize):
                fields = struct.unpack_from(fmt, table, pos)
                if self.is64:
                    st_name, _info, _other, _shndx, value, _size = fields
                else:
                    st_name, value, _size, _info, _other, _shndx = fields
                if st_name == 0 or st_name >= len(strtab):
                    continue
                end = strtab.find(b"\0", st_name)
                name = strtab[st_name : end if end >= 0 else len(strtab)].decode("utf-8", "replace")
                result[name] = value
        return result
