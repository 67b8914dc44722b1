"""Mechanism studies: why a student imitating a teacher moves toward the teacher's parameters."""
