"""meter.protocol"""
