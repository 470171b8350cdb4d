"""The benchmark behind ``crossent bench``: timing, memory and accuracy measurement, table output."""
