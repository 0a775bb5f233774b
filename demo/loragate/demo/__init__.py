"""loragate.demo"""
