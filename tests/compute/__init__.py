"""Tests of rfreport.compute."""
