"""Legacy PC devices: 8250 UART, i8042 reset line, ACPI power-management ports."""
