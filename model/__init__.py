"""Prismer and PrismerZ."""

from model.config import ModelConfig
from model.prismer import Prismer, PrismerCaption, PrismerVQA

__all__ = ["ModelConfig", "Prismer", "PrismerCaption", "PrismerVQA"]
